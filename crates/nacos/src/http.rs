//! The Nacos 1.x HTTP Open API for naming (`/nacos/v1/ns/...`), as the Java 1.x client, the old
//! Python client and `curl` scripts use it: parameters in the query string or a form body,
//! `ok` for writes, Nacos' JSON shapes for reads, `caused: ...;` text with a 4xx for bad input.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;
use sextant_core::model::{Registration, ServiceConfig, ServiceKey};
use sextant_core::HeartbeatResult;

use crate::mapping::{self, InfoOptions, NacosInstance, NacosRegistration, NacosService};
use crate::{lease_seconds, NacosError, Shared};

/// How long 1.x clients may cache a list answer, in ms (Nacos 1.x' default).
const LIST_CACHE_MILLIS: u64 = 3000;
/// How often 1.x clients should beat, in ms.
const BEAT_INTERVAL_MILLIS: u64 = 5000;
/// Nacos' beat answer codes: renewed, and "unknown instance, register again".
const BEAT_OK: u32 = 10200;
const BEAT_NOT_FOUND: u32 = 20404;

type AppState = State<Arc<Shared>>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.config.max_body_bytes;
    Router::new()
        .route(
            "/nacos/v1/ns/instance",
            post(register)
                .delete(deregister)
                .put(update)
                .patch(update)
                .get(get_instance),
        )
        .route("/nacos/v1/ns/instance/list", get(list))
        .route("/nacos/v1/ns/instance/beat", put(beat))
        .route(
            "/nacos/v1/ns/service",
            post(create_service)
                .put(update_service)
                .delete(delete_service)
                .get(get_service),
        )
        .route("/nacos/v1/ns/service/list", get(list_services))
        .route("/nacos/v1/ns/health/instance", put(set_health))
        .route("/nacos/v1/ns/operator/metrics", get(metrics))
        .route("/nacos/v1/ns/operator/switches", get(switches))
        .route("/nacos/v1/ns/operator/servers", get(servers))
        .route("/nacos/v1/console/health/liveness", get(|| async { "OK" }))
        .route("/nacos/v1/console/health/readiness", get(|| async { "OK" }))
        .route("/nacos/v1/console/namespaces", get(namespaces))
        .fallback(unsupported)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(shared)
}

impl IntoResponse for NacosError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::BAD_REQUEST);
        // Nacos' own error body: plain text, `caused: <message>;`.
        (status, format!("caused: {self};")).into_response()
    }
}

async fn unsupported(method: Method, uri: Uri) -> NacosError {
    let path = uri.path();
    if path.starts_with("/nacos/v1/cs") || path.starts_with("/nacos/v2/cs") {
        NacosError::Unsupported(format!(
            "{method} {path}: the Nacos config center is not part of Sextant (naming only)"
        ))
    } else {
        NacosError::NotFound(format!(
            "{method} {path} is not a Nacos naming endpoint Sextant serves"
        ))
    }
}

/// Request parameters from the query string and a form body together, as Nacos reads them.
pub struct Params(HashMap<String, String>);

impl<S: Send + Sync> FromRequest<S> for Params {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let mut map: HashMap<String, String> = req
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|ct| ct.starts_with("application/x-www-form-urlencoded"));
        let body = Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        if form && !body.is_empty() {
            map.extend(form_urlencoded::parse(&body).into_owned());
        }
        Ok(Params(map))
    }
}

impl Params {
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    fn required(&self, k: &'static str) -> Result<&str, NacosError> {
        match self.get(k).map(str::trim) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(NacosError::missing(k)),
        }
    }

    fn parse<T: std::str::FromStr>(&self, k: &'static str) -> Result<Option<T>, NacosError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(k).map(str::trim) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|e| NacosError::invalid(k, format!("{v:?}: {e}"))),
        }
    }

    /// Booleans as Java's `Boolean.parseBoolean` reads them, case-insensitively (the old
    /// Python client sends `True`); anything but true/false is refused.
    fn flag(&self, k: &'static str) -> Result<Option<bool>, NacosError> {
        match self.get(k).map(str::trim) {
            None | Some("") => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(NacosError::invalid(
                k,
                format!("{v:?} is not true or false"),
            )),
        }
    }

    fn port(&self) -> Result<u16, NacosError> {
        self.parse::<u16>("port")?
            .ok_or(NacosError::missing("port"))
    }

    fn namespace(&self) -> &str {
        mapping::namespace(self.get("namespaceId"))
    }

    fn service(&self) -> Result<(NacosService, ServiceKey), NacosError> {
        let svc = NacosService::parse(self.required("serviceName")?, self.get("groupName"))?;
        let key = svc.key(self.namespace())?;
        Ok((svc, key))
    }

    /// `clusterName`, or the older `cluster`.
    fn cluster(&self) -> &str {
        mapping::cluster(self.get("clusterName").or(self.get("cluster")))
    }

    fn metadata(&self) -> Result<Option<std::collections::BTreeMap<String, String>>, NacosError> {
        self.get("metadata")
            .map(mapping::parse_metadata)
            .transpose()
    }
}

fn ok() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "ok").into_response()
}

fn track<T>(shared: &Shared, what: &str, r: &Result<T, NacosError>) {
    let outcome = match r {
        Ok(_) => "ok",
        Err(e) => e.label(),
    };
    shared.metrics.request("http", what, outcome);
}

async fn register(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = do_register(&s, &p).await.map(|_| ok());
    track(&s, "instance.register", &r);
    r
}

async fn do_register(s: &Shared, p: &Params) -> Result<(), NacosError> {
    let (_, key) = p.service()?;
    let reg = NacosRegistration {
        ip: p.required("ip")?.to_string(),
        port: p.port()?,
        cluster: p.cluster().to_string(),
        weight: p.parse::<f64>("weight")?.unwrap_or(1.0),
        healthy: p.flag("healthy")?.unwrap_or(true),
        enabled: p.flag("enabled")?.or(p.flag("enable")?).unwrap_or(true),
        metadata: p.metadata()?.unwrap_or_default(),
    };
    let ephemeral = p.flag("ephemeral")?.unwrap_or(true);
    register_instance(s, key, &reg, ephemeral).await
}

/// Registers (or re-registers) what a 1.x client describes; ephemeral instances get a lease
/// that beats renew.
async fn register_instance(
    s: &Shared,
    key: ServiceKey,
    reg: &NacosRegistration,
    ephemeral: bool,
) -> Result<(), NacosError> {
    let existing = mapping::find_instance(&s.registry, &key, &reg.ip, reg.port, &reg.cluster)
        .map(|i| i.spec.id.to_string());
    let (spec, status) = reg.to_sextant(existing.as_deref())?;
    let ttl_seconds = if ephemeral {
        lease_seconds(s.config.http_beat_timeout)
    } else {
        0
    };
    s.registry
        .register(Registration {
            service: key.clone(),
            spec,
            status: Some(status),
            ttl_seconds,
        })
        .await?;
    if !ephemeral {
        crate::ensure_checked(&s.registry, &key).await?;
    }
    Ok(())
}

async fn deregister(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = do_deregister(&s, &p).await.map(|_| ok());
    track(&s, "instance.deregister", &r);
    r
}

async fn do_deregister(s: &Shared, p: &Params) -> Result<(), NacosError> {
    let (_, key) = p.service()?;
    let ip = p.required("ip")?;
    let port = p.port()?;
    // Deregistering what is not there is not an error in Nacos.
    if let Some(i) = mapping::find_instance(&s.registry, &key, ip, port, p.cluster()) {
        let id = i.spec.id.to_string();
        crate::apply(
            &s.registry,
            vec![sextant_core::Op::Deregister { service: key, id }],
        )
        .await?;
    }
    Ok(())
}

/// PUT and PATCH: the given fields replace the instance's, the others stay.
async fn update(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = do_update(&s, &p).await.map(|_| ok());
    track(&s, "instance.update", &r);
    r
}

async fn do_update(s: &Shared, p: &Params) -> Result<(), NacosError> {
    let (_, key) = p.service()?;
    let ip = p.required("ip")?;
    let port = p.port()?;
    let Some(i) = mapping::find_instance(&s.registry, &key, ip, port, p.cluster()) else {
        return Err(NacosError::NotFound(format!(
            "instance {ip}:{port} (cluster {}) not found in service {key}",
            p.cluster()
        )));
    };
    let mut spec = (*i.spec).clone();
    if let Some(m) = p.metadata()? {
        spec.metadata = m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    }
    let mut status = i.status;
    if let Some(w) = p.parse::<f64>("weight")? {
        status.weight = mapping::weight_to_sextant(w)?;
    }
    if let Some(e) = p.flag("enabled")?.or(p.flag("enable")?) {
        status.enabled = e;
    }
    if let Some(h) = p.flag("healthy")? {
        status.health = if h {
            sextant_core::model::Health::Healthy
        } else {
            sextant_core::model::Health::Unhealthy
        };
    }
    s.registry
        .register(Registration {
            service: key,
            spec,
            status: Some(status),
            ttl_seconds: i.ttl_seconds,
        })
        .await?;
    Ok(())
}

/// `PUT /nacos/v1/ns/health/instance`: an operator sets a persistent instance's health.
async fn set_health(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = async {
        let (_, key) = p.service()?;
        let ip = p.required("ip")?;
        let port = p.port()?;
        let healthy = p.flag("healthy")?.ok_or(NacosError::missing("healthy"))?;
        let i = mapping::find_instance(&s.registry, &key, ip, port, p.cluster())
            .ok_or_else(|| NacosError::NotFound(format!("instance {ip}:{port} not found")))?;
        let patch = sextant_core::model::StatusPatch {
            health: Some(if healthy {
                sextant_core::model::Health::Healthy
            } else {
                sextant_core::model::Health::Unhealthy
            }),
            ..Default::default()
        };
        s.registry
            .update_status(key, i.spec.id.to_string(), patch)
            .await?;
        Ok(ok())
    }
    .await;
    track(&s, "health.instance", &r);
    r
}

async fn get_instance(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = (|| {
        let (svc, key) = p.service()?;
        let ip = p.required("ip")?;
        let port = p.port()?;
        let i = mapping::find_instance(&s.registry, &key, ip, port, p.cluster())
            .ok_or_else(|| NacosError::NotFound("no matched ip found!".into()))?;
        let n = NacosInstance::from_sextant(&i, &svc, false);
        Ok(Json(json!({
            "service": n.service_name,
            "ip": n.ip,
            "port": n.port,
            "clusterName": n.cluster_name,
            "weight": n.weight,
            "healthy": n.healthy,
            "enabled": n.enabled,
            "ephemeral": n.ephemeral,
            "instanceId": n.instance_id,
            "metadata": n.metadata,
        }))
        .into_response())
    })();
    track(&s, "instance.get", &r);
    r
}

async fn list(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = (|| {
        let (_, key) = p.service()?;
        let opts = InfoOptions {
            grouped_name: true,
            clusters: mapping::cluster_filter(p.get("clusters")),
            healthy_only: p.flag("healthyOnly")?.unwrap_or(false),
            cache_millis: LIST_CACHE_MILLIS,
            now_ms: 0,
        };
        let body = s.infos.get(&s.registry, &key, &opts);
        Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
    })();
    track(&s, "instance.list", &r);
    r
}

/// A 1.x beat. With a `beat` body the client describes the instance, and one that is gone
/// (expired, server restarted) is registered again from it, as Nacos does; a light beat
/// without one gets 20404 so the client registers again itself.
async fn beat(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = do_beat(&s, &p).await;
    track(&s, "instance.beat", &r);
    r.map(|code| {
        Json(json!({
            "clientBeatInterval": BEAT_INTERVAL_MILLIS,
            "code": code,
            "lightBeatEnabled": true,
        }))
        .into_response()
    })
}

async fn do_beat(s: &Shared, p: &Params) -> Result<u32, NacosError> {
    let beat: Option<serde_json::Map<String, serde_json::Value>> = match p.get("beat") {
        Some(b) if !b.trim().is_empty() => Some(
            serde_json::from_str(b)
                .map_err(|e| NacosError::invalid("beat", format!("not a JSON object: {e}")))?,
        ),
        _ => None,
    };
    let from_beat = |k: &str| beat.as_ref().and_then(|b| b.get(k));
    let service_name = match p.get("serviceName").filter(|v| !v.trim().is_empty()) {
        Some(v) => v.to_string(),
        None => from_beat("serviceName")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or(NacosError::missing("serviceName"))?,
    };
    let svc = NacosService::parse(&service_name, p.get("groupName"))?;
    let key = svc.key(p.namespace())?;
    let ip = match p.get("ip").filter(|v| !v.is_empty()) {
        Some(ip) => ip.to_string(),
        None => from_beat("ip")
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or(NacosError::missing("ip"))?,
    };
    let port = match p.parse::<u16>("port")? {
        Some(port) => port,
        None => from_beat("port")
            .and_then(|v| v.as_u64())
            .and_then(|v| u16::try_from(v).ok())
            .ok_or(NacosError::missing("port"))?,
    };
    let cluster = match p.get("clusterName").or(p.get("cluster")) {
        Some(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => mapping::cluster(from_beat("cluster").and_then(|v| v.as_str())).to_string(),
    };
    if let Some(i) = mapping::find_instance(&s.registry, &key, &ip, port, &cluster) {
        let r = s
            .registry
            .heartbeat(&[(key.clone(), i.spec.id.to_string())]);
        if !matches!(r.first(), Some(HeartbeatResult::Unknown) | None) {
            return Ok(BEAT_OK);
        }
    }
    let Some(beat) = beat.as_ref() else {
        return Ok(BEAT_NOT_FOUND);
    };
    let metadata = beat
        .get("metadata")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), mapping::json_text(v.clone())))
                .collect()
        })
        .unwrap_or_default();
    let reg = NacosRegistration {
        ip,
        port,
        cluster,
        weight: beat.get("weight").and_then(|w| w.as_f64()).unwrap_or(1.0),
        healthy: true,
        enabled: true,
        metadata,
    };
    register_instance(s, key, &reg, true).await?;
    Ok(BEAT_OK)
}

fn service_exists(s: &Shared, key: &ServiceKey) -> bool {
    let view = s.registry.get(key, false);
    !view.instances.is_empty() || view.config != ServiceConfig::default()
}

fn threshold(p: &Params) -> Result<Option<f32>, NacosError> {
    match p.parse::<f32>("protectThreshold")? {
        Some(t) if !(0.0..=1.0).contains(&t) => Err(NacosError::invalid(
            "protectThreshold",
            format!("must be between 0 and 1, got {t}"),
        )),
        t => Ok(t),
    }
}

/// Sextant keeps no service-level metadata or selectors; refuse them rather than drop them.
fn refuse_service_extras(p: &Params) -> Result<(), NacosError> {
    if let Some(m) = p.metadata()? {
        if !m.is_empty() {
            return Err(NacosError::Unsupported(
                "service metadata is not kept by Sextant; put metadata on instances".into(),
            ));
        }
    }
    if let Some(sel) = p.get("selector") {
        let none = sel.trim().is_empty() || sel.contains("\"none\"");
        if !none {
            return Err(NacosError::Unsupported(
                "service selectors are not supported by Sextant".into(),
            ));
        }
    }
    Ok(())
}

async fn create_service(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = async {
        let (svc, key) = p.service()?;
        refuse_service_extras(&p)?;
        let t = threshold(&p)?.unwrap_or(0.0);
        if service_exists(&s, &key) {
            return Err(NacosError::Conflict(format!(
                "specified service already exists, serviceName : {}",
                svc.grouped()
            )));
        }
        let config = ServiceConfig {
            protect_threshold: t,
            ..ServiceConfig::default()
        };
        s.registry.configure(key, config).await?;
        Ok(ok())
    }
    .await;
    track(&s, "service.create", &r);
    r
}

async fn update_service(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = async {
        let (svc, key) = p.service()?;
        refuse_service_extras(&p)?;
        if !service_exists(&s, &key) {
            return Err(NacosError::NotFound(format!(
                "service {} not found",
                svc.grouped()
            )));
        }
        let mut config = s.registry.get(&key, false).config;
        if let Some(t) = threshold(&p)? {
            config.protect_threshold = t;
        }
        s.registry.configure(key, config).await?;
        Ok(ok())
    }
    .await;
    track(&s, "service.update", &r);
    r
}

async fn delete_service(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = async {
        let (svc, key) = p.service()?;
        let view = s.registry.get(&key, false);
        if !view.instances.is_empty() {
            return Err(NacosError::Conflict(format!(
                "service {} is not empty, can't be delete. Please unregister instance first",
                svc.grouped()
            )));
        }
        if view.config == ServiceConfig::default() {
            return Err(NacosError::NotFound(format!(
                "specified service not exist, serviceName : {}",
                svc.grouped()
            )));
        }
        s.registry.configure(key, ServiceConfig::default()).await?;
        Ok(ok())
    }
    .await;
    track(&s, "service.delete", &r);
    r
}

async fn get_service(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = (|| {
        let (svc, key) = p.service()?;
        if !service_exists(&s, &key) {
            return Err(NacosError::NotFound(format!(
                "service {} not found",
                svc.grouped()
            )));
        }
        let view = s.registry.get(&key, false);
        let mut clusters: Vec<&str> = view
            .instances
            .iter()
            .map(|i| mapping::cluster_of(&i.spec))
            .collect();
        clusters.sort_unstable();
        clusters.dedup();
        let clusters: Vec<_> = clusters
            .into_iter()
            .map(|c| json!({"name": c, "healthChecker": {"type": "NONE"}, "metadata": {}}))
            .collect();
        Ok(Json(json!({
            "namespaceId": &*key.namespace,
            "groupName": svc.group,
            "name": svc.name,
            // Through its shortest decimal form, so 0.8 stays 0.8 and not 0.800000011920929.
            "protectThreshold": view.config.protect_threshold.to_string().parse::<f64>().unwrap_or(0.0),
            "metadata": {},
            "selector": {"type": "none"},
            "clusters": clusters,
        }))
        .into_response())
    })();
    track(&s, "service.get", &r);
    r
}

/// The services of a namespace in one group, paged the way Nacos pages (1-based pages).
pub(crate) fn services_page(
    s: &Shared,
    namespace: &str,
    group: Option<&str>,
    page_no: usize,
    page_size: usize,
) -> (usize, Vec<String>) {
    let group = match group.map(str::trim) {
        None | Some("") => mapping::DEFAULT_GROUP,
        Some(g) => g,
    };
    let names: Vec<String> = s
        .registry
        .services(namespace)
        .into_iter()
        .map(|summary| NacosService::from_sextant(&summary.service.service))
        .filter(|svc| svc.group == group)
        .map(|svc| svc.name)
        .collect();
    let count = names.len();
    let start = page_no.max(1).saturating_sub(1).saturating_mul(page_size);
    let page = names.into_iter().skip(start).take(page_size).collect();
    (count, page)
}

async fn list_services(State(s): AppState, p: Params) -> Result<Response, NacosError> {
    let r = (|| {
        let page_no = p.parse::<usize>("pageNo")?.unwrap_or(1);
        let page_size = p.parse::<usize>("pageSize")?.unwrap_or(10);
        let (count, doms) =
            services_page(&s, p.namespace(), p.get("groupName"), page_no, page_size);
        Ok(Json(json!({"count": count, "doms": doms})).into_response())
    })();
    track(&s, "service.list", &r);
    r
}

async fn metrics(State(s): AppState) -> Response {
    let summaries = s.registry.namespaces();
    let services: usize = summaries.iter().map(|n| n.services).sum();
    let instances: usize = summaries.iter().map(|n| n.instances).sum();
    Json(json!({
        "status": "UP",
        "serviceCount": services,
        "instanceCount": instances,
        "responsibleServiceCount": services,
        "responsibleInstanceCount": instances,
        "subscribeCount": s.metrics.subscriptions.get(),
        "clientCount": s.metrics.connections.get(),
        "connectionBasedClientCount": s.metrics.connections.get(),
        "cpu": 0.0,
        "load": 0.0,
        "mem": 0.0,
    }))
    .into_response()
}

async fn switches() -> Response {
    Json(json!({
        "name": "00-00---000-NACOS_SWITCH_DOMAIN-000---00-00",
        "defaultPushCacheMillis": 10000,
        "clientBeatInterval": BEAT_INTERVAL_MILLIS,
        "defaultCacheMillis": LIST_CACHE_MILLIS,
        "distroEnabled": false,
        "healthCheckEnabled": true,
        "lightBeatEnabled": true,
        "pushEnabled": true,
    }))
    .into_response()
}

/// The one server of this "cluster", as Nacos' `/operator/servers` lists its members.
async fn servers(headers: axum::http::HeaderMap) -> Response {
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

async fn namespaces(State(s): AppState) -> Response {
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
