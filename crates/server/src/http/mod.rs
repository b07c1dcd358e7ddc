//! The native HTTP/JSON adapter: routes, strict request parsing, blocking queries, the SSE watch
//! stream, health endpoints and Prometheus metrics. Every failure is a JSON error with a 4xx or
//! 503 status; nothing here holds registry state.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, RawQuery,
    Request, State,
};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use sextant_core::model::acl::{status_right, Resource, Right};
use sextant_core::model::{Revision, ServiceKey, StatusPatch};
use sextant_core::{HeartbeatResult, Registry};
use tokio_stream::wrappers::ReceiverStream;

mod acl;
mod auth;
#[cfg(test)]
mod proptests;
pub(crate) use auth::Caller;
mod serve;
pub(crate) use serve::{serve, HttpLimits};

use crate::error::ApiError;
use crate::stream::Pump;
use crate::views::*;
use crate::{Node, ServerConfig};

#[derive(Clone)]
pub(crate) struct AppState {
    node: Arc<Node>,
}

impl AppState {
    fn registry(&self) -> &Registry {
        &self.node.registry
    }
    fn config(&self) -> &ServerConfig {
        &self.node.config
    }
}

/// A JSON body whose parse errors become JSON 4xx errors. The body is read as JSON when the
/// request says it is JSON, declares no type, or declares curl's default form type (`curl -d`
/// without `-H`), as Consul and etcd do; any other declared type is refused with 415.
pub(crate) struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|r| ApiError::new(r.status(), "invalid_argument", r.body_text()))?;
        parse_json_body(content_type.as_ref(), &body).map(ApiJson)
    }
}

/// Parses a request body of the native API: the content-type rule of [`ApiJson`], then JSON.
pub(crate) fn parse_json_body<T: DeserializeOwned>(
    content_type: Option<&HeaderValue>,
    body: &[u8],
) -> Result<T, ApiError> {
    if let Some(ct) = content_type {
        if !is_json_or_undeclared(ct) {
            let shown = String::from_utf8_lossy(ct.as_bytes());
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "unsupported content-type {shown:?}: send the body as JSON, with \
                     content-type: application/json or no content type"
                ),
            ));
        }
    }
    Json::<T>::from_bytes(body)
        .map(|Json(v)| v)
        .map_err(json_rejection)
}

/// `application/json`, `application/*+json`, curl's default `application/x-www-form-urlencoded`
/// or an empty type; parameters (`; charset=...`) and case do not matter.
fn is_json_or_undeclared(ct: &HeaderValue) -> bool {
    let Ok(ct) = ct.to_str() else { return false };
    let essence = ct.split(';').next().unwrap_or("").trim().as_bytes();
    let is = |t: &str| essence.eq_ignore_ascii_case(t.as_bytes());
    let starts =
        |p: &str| essence.len() >= p.len() && essence[..p.len()].eq_ignore_ascii_case(p.as_bytes());
    let ends = |p: &str| {
        essence.len() >= p.len()
            && essence[essence.len() - p.len()..].eq_ignore_ascii_case(p.as_bytes())
    };
    essence.is_empty()
        || is("application/json")
        || is("application/x-www-form-urlencoded")
        || (starts("application/") && ends("+json"))
}

/// `Json::from_bytes` only fails on syntax (400) or data (422): both are bad input.
fn json_rejection(r: JsonRejection) -> ApiError {
    ApiError::new(r.status(), "invalid_argument", r.body_text())
}

/// Query parameters whose parse errors become JSON 400s.
pub(crate) struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(q) => Ok(ApiQuery(q.0)),
            Err(r @ QueryRejection::FailedToDeserializeQueryString(_)) => {
                Err(ApiError::bad_request(r.body_text()))
            }
            Err(r) => Err(ApiError::bad_request(r.body_text())),
        }
    }
}

/// Path segments, with percent-decoding errors as JSON 400s.
pub(crate) struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|r| ApiError::bad_request(r.body_text()))
    }
}

pub(crate) fn router(node: Arc<Node>) -> Router {
    let limit = node.config.max_body_bytes;
    let eureka = node.eureka.as_ref().map(|e| e.router());
    let state = AppState { node };
    let instance = "/v1/namespaces/{ns}/services/{svc}/instances/{id}";
    Router::new()
        .route("/v1/namespaces", get(list_namespaces))
        .route("/v1/namespaces/{ns}/services", get(list_services))
        .route(
            "/v1/namespaces/{ns}/services/{svc}",
            get(get_service).put(configure_service),
        )
        .route(
            "/v1/namespaces/{ns}/services/{svc}/instances",
            post(post_instance),
        )
        .route(instance, put(put_instance).delete(delete_instance))
        .route(
            &format!("{instance}/status"),
            axum::routing::patch(patch_status),
        )
        .route(&format!("{instance}/drain"), post(drain))
        .route(&format!("{instance}/undrain"), post(undrain))
        .route("/v1/suspects", post(suspects))
        .route("/v1/heartbeats", post(heartbeats))
        .route("/v1/discover", post(discover))
        .route("/v1/watch", get(watch))
        .route("/v1/xds/clients", get(xds_clients))
        .route("/v1/snapshot", get(snapshot))
        .route("/v1/cluster", get(cluster_view))
        .route("/v1/whoami", get(whoami))
        .merge(acl::routes())
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(eureka.unwrap_or_default())
        .fallback(|| async { ApiError::not_found("no such endpoint; see the README for the API") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this endpoint",
            )
        })
        // The limit is enforced by `read_body` (which answers 413 cleanly); the extractors'
        // own limit is lifted so they see only bodies it let through.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(
            state.node.registry.clone(),
            auth::gate,
        ))
        .layer(middleware::from_fn_with_state(limit, read_body))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Most of an oversized body read (and thrown away) before answering 413, and for how long:
/// a server that answers while the client is still sending, then closes, makes the client's
/// kernel see a reset instead of the 413.
const DRAIN_BYTES: usize = 64 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads the request body up to `limit`; a larger body is drained (bounded) and refused with a
/// JSON 413 the client can actually read.
async fn read_body(State(limit): State<usize>, req: Request, next: Next) -> Response {
    use http_body_util::BodyExt;
    let (parts, mut body) = req.into_parts();
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    let deadline = tokio::time::Instant::now() + DRAIN_TIME;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => f,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return ApiError::bad_request(format!("cannot read the request body: {e}"))
                    .into_response()
            }
            Err(_) if seen > limit => break,
            Err(_) => {
                return ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    "the request body did not arrive in time",
                )
                .into_response()
            }
        };
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen <= limit {
                buf.extend_from_slice(&data);
            } else if seen > DRAIN_BYTES {
                break;
            }
        }
    }
    if seen > limit {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than the limit of {limit} bytes (max_body_bytes)"),
        )
        .into_response();
    }
    next.run(Request::from_parts(parts, Body::from(buf.freeze())))
        .await
}

async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let started = tokio::time::Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    if resp.status().is_server_error() {
        tracing::warn!(%method, route, status, "request failed");
    }
    s.node.api_metrics.observe(
        "http",
        method.as_str(),
        &route,
        status,
        started.elapsed().as_secs_f64(),
    );
    resp
}

fn service_key(ns: &str, svc: &str) -> Result<ServiceKey, ApiError> {
    Ok(ServiceKey::new(ns, svc)?)
}

async fn put_instance(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((ns, svc, id)): ApiPath<(String, String, String)>,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<Json<RevisionBody>, ApiError> {
    let key = service_key(&ns, &svc)?;
    caller.allow(Right::Write, &Resource::Instance(&ns, &svc, &id))?;
    if body.id.as_ref().is_some_and(|b| *b != id) {
        return Err(ApiError::bad_request(
            "invalid id: the body's id differs from the one in the path",
        ));
    }
    let reg = body.into_registration(key, Some(id))?;
    let revision = s.registry().register(reg).await?;
    Ok(Json(RevisionBody { revision }))
}

async fn post_instance(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((ns, svc)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = service_key(&ns, &svc)?;
    let reg = body.into_registration(key, None)?;
    let id = reg.spec.id.clone();
    caller.allow(Right::Write, &Resource::Instance(&ns, &svc, &id))?;
    let revision = s.registry().register(reg).await?;
    Ok(Json(serde_json::json!({"revision": revision, "id": id})))
}

async fn delete_instance(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((ns, svc, id)): ApiPath<(String, String, String)>,
) -> Result<Json<RevisionBody>, ApiError> {
    let key = service_key(&ns, &svc)?;
    caller.allow(Right::Write, &Resource::Instance(&ns, &svc, &id))?;
    let revision = s.registry().deregister(key, id).await?;
    Ok(Json(RevisionBody { revision }))
}

async fn patch_status(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((ns, svc, id)): ApiPath<(String, String, String)>,
    ApiJson(body): ApiJson<StatusBody>,
) -> Result<Json<RevisionBody>, ApiError> {
    let key = service_key(&ns, &svc)?;
    let patch: StatusPatch = body.into();
    caller.allow(status_right(&patch), &Resource::Instance(&ns, &svc, &id))?;
    let revision = s.registry().update_status(key, id, patch).await?;
    Ok(Json(RevisionBody { revision }))
}

async fn configure_service(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((ns, svc)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<ServiceSettingsBody>,
) -> Result<Json<RevisionBody>, ApiError> {
    let key = service_key(&ns, &svc)?;
    caller.allow(Right::Operate, &Resource::Service(&ns, &svc))?;
    if body.protect_threshold.is_none() && body.check.is_none() {
        return Err(ApiError::bad_request(
            "invalid settings: give at least one of protect_threshold, check",
        ));
    }
    let mut config = s.registry().get(&key, false).config;
    if let Some(t) = body.protect_threshold {
        config.protect_threshold = t;
    }
    if let Some(c) = body.check {
        config.check = c;
    }
    let revision = s.registry().configure(key, config).await?;
    Ok(Json(RevisionBody { revision }))
}

async fn set_draining(
    s: &AppState,
    caller: Caller,
    ns: &str,
    svc: &str,
    id: String,
    on: bool,
) -> Result<Json<RevisionBody>, ApiError> {
    let key = service_key(ns, svc)?;
    caller.allow(Right::Operate, &Resource::Instance(ns, svc, &id))?;
    let patch = StatusPatch {
        draining: Some(on),
        ..Default::default()
    };
    let revision = s.registry().update_status(key, id, patch).await?;
    Ok(Json(RevisionBody { revision }))
}

/// Takes an instance out of discovery at once, keeping its lease and health tracked.
async fn drain(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((ns, svc, id)): ApiPath<(String, String, String)>,
) -> Result<Json<RevisionBody>, ApiError> {
    set_draining(&s, caller, &ns, &svc, id, true).await
}

async fn undrain(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((ns, svc, id)): ApiPath<(String, String, String)>,
) -> Result<Json<RevisionBody>, ApiError> {
    set_draining(&s, caller, &ns, &svc, id, false).await
}

/// `POST /v1/suspects`: asks the scanner to re-probe instances a client saw failing.
async fn suspects(
    State(s): State<AppState>,
    caller: Caller,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(body): ApiJson<SuspectBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Some(scanner) = &s.node.scanner else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the health scanner is turned off on this node",
        ));
    };
    let reporter = body.reporter.unwrap_or_else(|| peer.ip().to_string());
    let mut results = Vec::with_capacity(body.instances.len());
    for i in &body.instances {
        let key = service_key(&i.namespace, &i.service)?;
        caller.allow(Right::Read, &Resource::Service(&i.namespace, &i.service))?;
        let outcome = scanner.suspect(key, &i.id, &reporter).await;
        results.push(serde_json::json!({
            "namespace": i.namespace, "service": i.service, "id": i.id, "outcome": outcome.as_str(),
        }));
    }
    Ok(Json(serde_json::json!({ "results": results })))
}

async fn heartbeats(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(items): ApiJson<Vec<InstanceRefBody>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let keys = items
        .iter()
        .map(|i| {
            let key = service_key(&i.namespace, &i.service)?;
            caller.allow(
                Right::Write,
                &Resource::Instance(&i.namespace, &i.service, &i.id),
            )?;
            Ok((key, i.id.clone()))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    // A follower that can neither forward renewals nor hold through a store outage refuses
    // (the leader decides expiries; see core's registry docs).
    s.registry().renews_leases()?;
    let results = s.registry().heartbeat(&keys);
    let mut renewed = 0;
    let mut persistent = 0;
    let mut unknown = Vec::new();
    for (item, r) in items.into_iter().zip(results) {
        match r {
            HeartbeatResult::Renewed => renewed += 1,
            HeartbeatResult::Persistent => persistent += 1,
            HeartbeatResult::Unknown => unknown.push(item),
        }
    }
    Ok(Json(serde_json::json!({
        "renewed": renewed,
        "persistent": persistent,
        "unknown": unknown,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GetQuery {
    #[serde(default)]
    healthy: bool,
    index: Option<Revision>,
    wait: Option<String>,
}

fn parse_wait(wait: Option<&str>, max: Duration) -> Result<Duration, ApiError> {
    let Some(w) = wait else {
        return Ok(Duration::from_secs(30).min(max));
    };
    let d = match w.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(w).map_err(|e| {
            ApiError::bad_request(format!("invalid wait {w:?}: {e} (use e.g. 30s, 2m)"))
        })?,
    };
    Ok(d.min(max))
}

async fn get_service(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((ns, svc)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<GetQuery>,
) -> Result<Response, ApiError> {
    let key = service_key(&ns, &svc)?;
    caller.allow(Right::Read, &Resource::Service(&ns, &svc))?;
    let view = match q.index {
        Some(index) => {
            let wait = parse_wait(q.wait.as_deref(), s.config().max_wait())?;
            s.registry()
                .get_when_changed(&key, index, wait, q.healthy)
                .await
        }
        None => {
            if q.wait.is_some() {
                return Err(ApiError::bad_request(
                    "wait needs index (the revision to wait past)",
                ));
            }
            s.registry().get(&key, q.healthy)
        }
    };
    let mut resp = Json(ServiceJson::from(&view)).into_response();
    resp.headers_mut()
        .insert("x-sextant-revision", HeaderValue::from(view.revision));
    Ok(resp)
}

async fn discover(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<DiscoverBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let keys = body
        .services
        .iter()
        .map(|r| {
            let key = service_key(&r.namespace, &r.service)?;
            caller.allow(Right::Read, &Resource::Service(&r.namespace, &r.service))?;
            Ok::<_, ApiError>(key)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (revision, views) = s.registry().discover(&keys, body.healthy_only);
    let services: Vec<ServiceJson<'_>> = views.iter().map(ServiceJson::from).collect();
    Ok(Json(serde_json::json!({
        "revision": revision,
        "services": services,
    })))
}

/// A consistent snapshot of the whole registry (`sextant snapshot save`): every store record
/// at one revision, in the checksummed snapshot format `sextant snapshot restore` reads. It
/// holds every namespace: `admin` on `*`.
async fn snapshot(State(s): State<AppState>, caller: Caller) -> Response {
    if let Err(e) = caller.allow(Right::Admin, &Resource::Global) {
        return e.into_response();
    }
    let registry = s.registry().clone();
    // Encoding a large registry takes a while: off the request threads.
    let snap = match tokio::task::spawn_blocking(move || registry.snapshot()).await {
        Ok(snap) => snap,
        Err(e) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the snapshot task stopped: {e}"),
            )
            .into_response()
        }
    };
    let (services, instances) = snap.counts();
    tracing::info!(
        revision = snap.revision,
        services,
        instances,
        "snapshot taken"
    );
    let mut resp = (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        snap.to_bytes(),
    )
        .into_response();
    resp.headers_mut()
        .insert("x-sextant-revision", HeaderValue::from(snap.revision));
    resp
}

async fn list_namespaces(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.allow(Right::Read, &Resource::Global)?;
    let list: Vec<_> = s
        .registry()
        .namespaces()
        .into_iter()
        .map(|n| serde_json::json!({"namespace": &*n.namespace, "services": n.services, "instances": n.instances}))
        .collect();
    Ok(Json(serde_json::json!({ "namespaces": list })))
}

async fn list_services(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(ns): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    sextant_core::model::validate_name("namespace", &ns)?;
    caller.allow(Right::Read, &Resource::Namespace(&ns))?;
    let list: Vec<_> = s
        .registry()
        .services(&ns)
        .into_iter()
        .map(|x| serde_json::json!({"service": &*x.service.service, "revision": x.revision, "instances": x.instances, "serving": x.serving}))
        .collect();
    Ok(Json(
        serde_json::json!({ "namespace": ns, "services": list }),
    ))
}

/// `GET /v1/watch?service=ns/svc&service=...&since=R` as server-sent events. `Last-Event-ID`
/// (sent by EventSource clients on reconnect) resumes like `since`.
async fn watch(
    State(s): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let (services, since) = parse_watch_query(query.as_deref(), headers.get("last-event-id"))?;
    for k in &services {
        caller.allow(Right::Read, &Resource::Service(&k.namespace, &k.service))?;
    }
    let sub = s.registry().subscribe(services, since);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let pump = Pump {
        tx,
        slow_timeout: s.config().slow_subscriber_timeout(),
        keepalive: Some((
            Duration::from_secs(15),
            Bytes::from_static(b": keepalive\n\n"),
        )),
        core: s.registry().metrics().clone(),
        api: s.node.api_metrics.clone(),
        peer: "sse".into(),
        revoked: crate::stream::revoked(s.registry().clone(), caller.0),
    };
    tokio::spawn(pump.run(sub, sse::delivery, sse::close));
    let body = Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, Infallible>));
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(body)
        .unwrap_or_default())
}

/// The services and resume point of a watch: `service=ns/svc` (repeated, or comma-separated)
/// and `since=R`, or else the `Last-Event-ID` an EventSource reconnects with.
pub(crate) fn parse_watch_query(
    query: Option<&str>,
    last_event_id: Option<&HeaderValue>,
) -> Result<(Vec<ServiceKey>, Option<Revision>), ApiError> {
    let mut services = Vec::new();
    let mut since = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "service" => {
                for one in v.split(',').filter(|x| !x.is_empty()) {
                    services.push(ServiceKey::parse(one)?);
                }
            }
            "since" => {
                since = Some(v.parse::<Revision>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "invalid since {v:?}: expected a revision number"
                    ))
                })?)
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {other:?}: use service=namespace/service and since=REVISION"
                )))
            }
        }
    }
    if services.is_empty() {
        return Err(ApiError::bad_request(
            "give at least one service=namespace/service",
        ));
    }
    if since.is_none() {
        // A malformed Last-Event-ID is ignored: the browser sends back what it was given.
        since = last_event_id
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
    }
    Ok((services, since))
}

/// `GET /v1/xds/clients`: every open ADS stream — its node, locality, and per resource type
/// what it subscribed to, the versions sent and acknowledged, its NACKs.
async fn xds_clients(State(s): State<AppState>, caller: Caller) -> Result<Response, ApiError> {
    caller.allow(Right::Read, &Resource::Global)?;
    let xds = s.node.xds.as_ref().ok_or_else(|| {
        ApiError::not_found("xDS is turned off on this node (see the xds setting)")
    })?;
    Ok(axum::Json(serde_json::json!({ "clients": xds.clients() })).into_response())
}

/// The cluster's members and roles: operators' view, `read` on `*`.
async fn cluster_view(
    State(s): State<AppState>,
    caller: Caller,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.allow(Right::Read, &Resource::Global)?;
    let n = &s.node;
    let kind = n.config.store.to_string();
    Ok(Json(
        crate::cluster::view(
            n.cluster.as_ref(),
            &n.registry,
            &kind,
            n.store.write_outage(),
        )
        .await,
    ))
}

/// Not ready while shutting down, or degraded while the store refuses writes (a full disk, etcd
/// unreachable): reads, watches and heartbeats still work, but a node that cannot take
/// registrations should not be sent them. Ready again once the store takes writes (its own
/// probe notices without waiting for a client's write).
async fn readyz(State(s): State<AppState>) -> Response {
    if s.registry().is_closing() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if let Some(why) = s.node.store.write_outage() {
        let body = format!(
            "degraded: the store refuses writes ({why}); reads, watches and heartbeats are served from memory\n"
        );
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &s.node.prometheus) {
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// `GET /v1/whoami`: who the server takes the caller to be — its address, whether the
/// connection is TLS and, with mTLS, the verified client certificate's identity (the
/// credential the auth layer reads from the same `PeerIdentity` extension).
async fn whoami(conn: Option<axum::Extension<crate::tls::ConnInfo>>) -> Json<serde_json::Value> {
    // Every served connection has it; only the router's unit tests call it bare.
    let c = conn.map(|axum::Extension(c)| c);
    Json(serde_json::json!({
        "addr": c.as_ref().map(|c| c.remote.to_string()),
        "tls": c.as_ref().is_some_and(|c| c.tls),
        "identity": c.and_then(|c| c.peer),
    }))
}
