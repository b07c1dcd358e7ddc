//! The routes and handlers of Eureka's REST API, under both `/eureka` and `/eureka/v2`:
//!
//! | request | answer |
//! |---|---|
//! | `POST /apps/{APP}` `{"instance": {...}}` | register or replace → 204 |
//! | `PUT /apps/{APP}/{id}` | renew the lease → 200; 404 when unknown or the client's `lastDirtyTimestamp` is newer |
//! | `DELETE /apps/{APP}/{id}` | cancel → 200; 404 when unknown |
//! | `GET /apps/`, `/apps/{APP}`, `/apps/{APP}/{id}`, `/instances/{id}` | JSON when `Accept` names json, else XML |
//! | `PUT /apps/{APP}/{id}/status?value=S`, `DELETE .../status` | set / remove a status override → 200 |
//! | `GET /apps/delta` | 403, as a Eureka server with deltas disabled: clients fetch `/apps/` |
//! | `/vips`, `/svips`, `.../metadata`, `/peerreplication`, `/asg` | 501 naming what is not served |
//! | anything else under `/eureka` | 404 naming the path |

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{OriginalUri, Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::Router;
use serde_json::Value;
use sextant_core::model::{now_ms, Instance, InstanceStatus, Registration, ServiceKey};
use sextant_core::{CoreError, HeartbeatResult};

use crate::mapping::{self, EurekaStatus, NAMESPACE};
use crate::{xml, Eureka, EurekaError};

/// The two prefixes Eureka clients use: Spring's `/eureka/apps/`, eureka-js-client's default
/// `/eureka/v2/apps/`.
pub const PREFIXES: [&str; 2] = ["/eureka", "/eureka/v2"];

pub(crate) fn routes<S: Clone + Send + Sync + 'static>(eureka: Eureka) -> Router<S> {
    let mut r: Router<Eureka> = Router::new();
    for p in PREFIXES {
        r = r
            .route(&format!("{p}/apps"), get(get_apps))
            .route(&format!("{p}/apps/"), get(get_apps))
            .route(&format!("{p}/apps/delta"), get(get_delta))
            .route(&format!("{p}/apps/{{app}}"), post(register).get(get_app))
            .route(
                &format!("{p}/apps/{{app}}/{{id}}"),
                put(renew).delete(cancel).get(get_instance),
            )
            .route(
                &format!("{p}/apps/{{app}}/{{id}}/status"),
                put(put_status).delete(delete_status),
            )
            .route(
                &format!("{p}/apps/{{app}}/{{id}}/metadata"),
                any(unsupported),
            )
            .route(&format!("{p}/instances/{{id}}"), get(get_instance_by_id))
            .route(&format!("{p}/vips/{{*rest}}"), any(unsupported))
            .route(&format!("{p}/svips/{{*rest}}"), any(unsupported))
            .route(&format!("{p}/peerreplication/{{*rest}}"), any(unsupported))
            .route(&format!("{p}/asg/{{*rest}}"), any(unsupported));
    }
    r.route("/eureka", any(unknown))
        .route("/eureka/", any(unknown))
        .route("/eureka/{*rest}", any(unknown))
        .with_state(eureka)
}

/// Counts the request under `endpoint` and turns an error into its answer.
fn answer(e: &Eureka, endpoint: &'static str, r: Result<Response, EurekaError>) -> Response {
    match r {
        Ok(resp) => {
            e.metrics.observe(endpoint, "ok");
            resp
        }
        Err(err) => {
            let kind = err.kind();
            e.metrics.observe(endpoint, kind.label());
            if kind.http_status() >= 500 && kind != sextant_core::ErrorKind::Unsupported {
                tracing::warn!(endpoint, error = %err, "eureka request failed");
            }
            err.into_response()
        }
    }
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, EurekaError> {
    p.map(|Path(v)| v)
        .map_err(|r| EurekaError::BadRequest(r.body_text()))
}

fn service_key(app: &str) -> Result<ServiceKey, EurekaError> {
    let service = mapping::app_to_service(app)?;
    ServiceKey::new(NAMESPACE, &service).map_err(|e| EurekaError::BadRequest(e.to_string()))
}

fn query_param(q: &Option<String>, name: &str) -> Option<String> {
    let q = q.as_deref()?;
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// JSON when the client's `Accept` names json (as both Eureka clients send), XML otherwise.
fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("json"))
}

/// `{root: inner}` as JSON, or `<root>...</root>` as XML.
fn encode(headers: &HeaderMap, root: &str, inner: Value) -> Response {
    if wants_json(headers) {
        let mut o = serde_json::Map::new();
        o.insert(root.into(), inner);
        (
            [(header::CONTENT_TYPE, "application/json")],
            Value::Object(o).to_string(),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "application/xml")],
            xml::to_xml(root, &inner),
        )
            .into_response()
    }
}

async fn register(
    State(e): State<Eureka>,
    p: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = async {
        let _app = path(p)?;
        if let Some(ct) = headers.get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
            if ct.contains("xml") {
                return Err(EurekaError::UnsupportedMediaType(
                    "XML registrations are not served: send the instance as JSON \
                     (content-type: application/json)"
                        .into(),
                ));
            }
        }
        let value: Value = serde_json::from_slice(&body)
            .map_err(|err| EurekaError::BadRequest(format!("the body is not JSON: {err}")))?;
        let reg = mapping::parse_register(&value, now_ms())?;
        let key = ServiceKey::new(NAMESPACE, &reg.service)
            .map_err(|err| EurekaError::BadRequest(err.to_string()))?;
        let existing = e.registry.instance(&key, &reg.spec.id);
        let mut spec = reg.spec;
        let mut status = reg.status;
        if let Some(old) = &existing {
            // Eureka keeps the registration with the newer lastDirtyTimestamp.
            if let (Some(theirs), Some(ours)) = (reg.last_dirty, mapping::last_dirty(&old.spec)) {
                if ours > theirs && old.ttl_seconds > 0 {
                    e.registry.heartbeat(&[(key, spec.id.to_string())]);
                    return Ok(StatusCode::NO_CONTENT.into_response());
                }
            }
            // A status override outlives re-registrations until it is deleted; an operator's
            // weights stay too.
            let overridden = mapping::override_of(&old.spec);
            spec = mapping::with_override(&spec, overridden);
            status = InstanceStatus {
                enabled: overridden.is_none_or(|o| !mapping::override_disables(o)),
                weight: old.status.weight,
                weight_override: old.status.weight_override,
                ..status
            };
        }
        e.registry
            .register(Registration {
                service: key,
                spec,
                status: Some(status),
                ttl_seconds: reg.ttl_seconds,
            })
            .await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    answer(&e, "register", r)
}

async fn renew(
    State(e): State<Eureka>,
    p: Result<Path<(String, String)>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Response {
    let r = (|| {
        let (app, id) = path(p)?;
        let key = service_key(&app)?;
        // A client whose registration is newer than ours must register again (Eureka's 404).
        if let Some(theirs) =
            query_param(&q, "lastDirtyTimestamp").and_then(|s| s.parse::<u64>().ok())
        {
            if let Some(inst) = e.registry.instance(&key, &id) {
                if mapping::last_dirty(&inst.spec).is_some_and(|ours| theirs > ours) {
                    return Err(EurekaError::NotFound(format!(
                        "instance {id} of {app} was registered with an older lastDirtyTimestamp: \
                         register again"
                    )));
                }
            }
        }
        match e.registry.heartbeat(&[(key, id.clone())]).first() {
            Some(HeartbeatResult::Renewed | HeartbeatResult::Persistent) => {
                Ok(StatusCode::OK.into_response())
            }
            _ => Err(not_registered(&app, &id)),
        }
    })();
    answer(&e, "renew", r)
}

async fn cancel(
    State(e): State<Eureka>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let r = async {
        let (app, id) = path(p)?;
        let key = service_key(&app)?;
        match e.registry.deregister(key, id.clone()).await {
            Ok(_) => Ok(StatusCode::OK.into_response()),
            Err(CoreError::NotFound(_)) => Err(not_registered(&app, &id)),
            Err(err) => Err(err.into()),
        }
    }
    .await;
    answer(&e, "cancel", r)
}

fn status_value(q: &Option<String>, required: bool) -> Result<Option<EurekaStatus>, EurekaError> {
    match query_param(q, "value").filter(|v| !v.trim().is_empty()) {
        Some(v) => {
            let s = EurekaStatus::parse(&v);
            if s == EurekaStatus::Unknown && !v.trim().eq_ignore_ascii_case("UNKNOWN") {
                return Err(EurekaError::BadRequest(format!(
                    "invalid value {v:?}: one of UP, DOWN, STARTING, OUT_OF_SERVICE, UNKNOWN"
                )));
            }
            Ok(Some(s))
        }
        None if required => Err(EurekaError::BadRequest(
            "missing value: PUT .../status?value=OUT_OF_SERVICE".into(),
        )),
        None => Ok(None),
    }
}

fn not_registered(app: &str, id: &str) -> EurekaError {
    EurekaError::NotFound(format!("instance {id} of {app} is not registered"))
}

/// The instance `id` of `key` (app `app`), or the 404 a Eureka client expects.
fn registered(e: &Eureka, key: &ServiceKey, app: &str, id: &str) -> Result<Instance, EurekaError> {
    e.registry
        .instance(key, id)
        .ok_or_else(|| not_registered(app, id))
}

/// Re-registers `inst` with a new spec and status (the lease keeps its TTL).
async fn rewrite(
    e: &Eureka,
    key: ServiceKey,
    inst: Instance,
    spec: sextant_core::model::InstanceSpec,
    status: InstanceStatus,
) -> Result<(), EurekaError> {
    e.registry
        .register(Registration {
            service: key,
            spec,
            status: Some(status),
            ttl_seconds: inst.ttl_seconds,
        })
        .await?;
    Ok(())
}

async fn put_status(
    State(e): State<Eureka>,
    p: Result<Path<(String, String)>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Response {
    let r = async {
        let (app, id) = path(p)?;
        let key = service_key(&app)?;
        let value = status_value(&q, true)?.unwrap_or(EurekaStatus::Unknown);
        let inst = registered(&e, &key, &app, &id)?;
        // UNKNOWN as an override means "no override", as in Eureka.
        let overridden = (value != EurekaStatus::Unknown).then_some(value);
        let spec = mapping::with_override(&inst.spec, overridden);
        let status = InstanceStatus {
            enabled: overridden.is_none_or(|o| !mapping::override_disables(o)),
            ..inst.status
        };
        rewrite(&e, key, inst, spec, status).await?;
        Ok(StatusCode::OK.into_response())
    }
    .await;
    answer(&e, "status_override", r)
}

async fn delete_status(
    State(e): State<Eureka>,
    p: Result<Path<(String, String)>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Response {
    let r = async {
        let (app, id) = path(p)?;
        let key = service_key(&app)?;
        let value = status_value(&q, false)?;
        let inst = registered(&e, &key, &app, &id)?;
        let mut spec = mapping::with_override(&inst.spec, None);
        let mut status = InstanceStatus {
            enabled: true,
            ..inst.status
        };
        // `value` (optional) becomes the instance's own status, as in Eureka.
        if let Some(v) = value {
            spec = mapping::with_own_status(&spec, v);
            status.health = if v == EurekaStatus::Up {
                sextant_core::model::Health::Healthy
            } else {
                sextant_core::model::Health::Unhealthy
            };
        }
        rewrite(&e, key, inst, spec, status).await?;
        Ok(StatusCode::OK.into_response())
    }
    .await;
    answer(&e, "status_delete", r)
}

/// Every application of the `public` namespace, from one consistent cut of the registry.
fn applications(e: &Eureka) -> (u64, Vec<Value>) {
    let named: Vec<(String, ServiceKey)> = e
        .registry
        .services(NAMESPACE)
        .into_iter()
        .filter(|s| s.instances > 0)
        .filter_map(|s| mapping::service_to_app(&s.service.service).map(|app| (app, s.service)))
        .collect();
    let keys: Vec<ServiceKey> = named.iter().map(|(_, k)| k.clone()).collect();
    let (revision, views) = e.registry.discover(&keys, false);
    let apps = named
        .iter()
        .zip(views)
        .filter(|(_, v)| !v.instances.is_empty())
        .map(|((app, key), v)| {
            mapping::render_application(app, &key.service, &v.instances, v.protected)
        })
        .collect();
    (revision, apps)
}

async fn get_apps(State(e): State<Eureka>, headers: HeaderMap) -> Response {
    let (revision, apps) = applications(&e);
    let all = mapping::render_applications(revision, apps);
    let inner = all.get("applications").cloned().unwrap_or(Value::Null);
    answer(&e, "apps", Ok(encode(&headers, "applications", inner)))
}

async fn get_delta(State(e): State<Eureka>) -> Response {
    answer(&e, "delta", Err(EurekaError::DeltaDisabled))
}

async fn get_app(
    State(e): State<Eureka>,
    p: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let r = (|| {
        let app = path(p)?;
        let key = service_key(&app)?;
        let view = e.registry.get(&key, false);
        if view.instances.is_empty() {
            return Err(EurekaError::NotFound(format!(
                "application {app} has no instances"
            )));
        }
        let name = app.to_ascii_uppercase();
        let inner =
            mapping::render_application(&name, &key.service, &view.instances, view.protected);
        Ok(encode(&headers, "application", inner))
    })();
    answer(&e, "app", r)
}

async fn get_instance(
    State(e): State<Eureka>,
    p: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let r = (|| {
        let (app, id) = path(p)?;
        let key = service_key(&app)?;
        let inst = registered(&e, &key, &app, &id)?;
        let protected = e.registry.get(&key, true).protected;
        let inner =
            mapping::render_instance(&app.to_ascii_uppercase(), &key.service, &inst, protected);
        Ok(encode(&headers, "instance", inner))
    })();
    answer(&e, "instance", r)
}

async fn get_instance_by_id(
    State(e): State<Eureka>,
    p: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let r = (|| {
        let id = path(p)?;
        for s in e.registry.services(NAMESPACE) {
            let Some(app) = mapping::service_to_app(&s.service.service) else {
                continue;
            };
            if let Some(inst) = e.registry.instance(&s.service, &id) {
                let protected = e.registry.get(&s.service, true).protected;
                let inner = mapping::render_instance(&app, &s.service.service, &inst, protected);
                return Ok(encode(&headers, "instance", inner));
            }
        }
        Err(EurekaError::NotFound(format!(
            "no instance {id} is registered"
        )))
    })();
    answer(&e, "instance", r)
}

async fn unsupported(State(e): State<Eureka>, OriginalUri(uri): OriginalUri) -> Response {
    let r = Err(EurekaError::Unsupported(format!(
        "{} is not served by Sextant's Eureka adapter (see the README, \"Eureka clients\")",
        uri.path()
    )));
    answer(&e, "unsupported", r)
}

async fn unknown(State(e): State<Eureka>, OriginalUri(uri): OriginalUri) -> Response {
    let r = Err(EurekaError::NotFound(format!(
        "no Eureka endpoint {}: the API is under /eureka/apps/ and /eureka/v2/apps/",
        uri.path()
    )));
    answer(&e, "unknown", r)
}

#[cfg(test)]
mod tests;
